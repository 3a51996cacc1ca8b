# Flotilla state step: declared uids and gids against this host's /etc/passwd and /etc/group.
#
# NixOS does not renumber an existing user or group whose declared uid/gid changed (it
# warns and keeps the old id), so files and the configuration silently disagree. The
# check reports every mismatch as one error item; "renumber" changes the ids on the
# host to the declared ones and re-owns their files, "keep" leaves the host as it is.
{ config, lib, pkgs, ... }:

let
  users = lib.filterAttrs (_: u: u.uid != null) config.users.users;
  groups = lib.filterAttrs (_: g: g.gid != null) config.users.groups;
  declared = lib.concatStringsSep "\n" (
    lib.mapAttrsToList (_: u: "user ${u.name} ${toString u.uid}") users
    ++ lib.mapAttrsToList (_: g: "group ${g.name} ${toString g.gid}") groups);

  # Sets $mismatches to lines "user|group NAME HOST_ID DECLARED_ID" (shell builtins only).
  findMismatches = ''
    passwd=/etc/passwd
    group=/etc/group
    mismatches=""
    while read -r kind name want; do
      [ -n "$kind" ] || continue
      if [ "$kind" = user ]; then file=$passwd; else file=$group; fi
      while IFS=: read -r n _ id _; do
        if [ "$n" = "$name" ] && [ "$id" != "$want" ]; then
          mismatches="$mismatches$kind $name $id $want
    "
        fi
      done < "$file"
    done <<'DECLARED'
    ${declared}
    DECLARED
  '';

  check = pkgs.writeShellScript "flotilla-uid-gid-check" ''
    set -eu
    ${findMismatches}
    if [ -z "$mismatches" ]; then
      printf '{"items": []}\n'
      exit 0
    fi
    message=""
    while read -r kind name have want; do
      [ -n "$kind" ] || continue
      message="$message''${message:+; }$kind $name has id $have here, $want in the configuration"
    done <<MISMATCHES
    $mismatches
    MISMATCHES
    printf '{"items": [{"id": "id-mismatch", "severity": "error", "message": "%s", "choices": [{"id": "renumber", "label": "renumber", "description": "change the ids on this host to the declared ones and re-own their files", "destructive": true}, {"id": "keep", "label": "keep", "description": "keep this host'"'"'s ids; NixOS will not apply the declared ones", "destructive": false}], "default": null}]}\n' \
      "$message"
  '';

  renumber = pkgs.writeShellScript "flotilla-uid-gid-renumber" ''
    set -eu
    export PATH=${lib.makeBinPath [ pkgs.shadow pkgs.findutils pkgs.coreutils ]}:$PATH
    ${findMismatches}
    printf '%s' "$mismatches" | while read -r kind name have want; do
      [ -n "$kind" ] || continue
      if [ "$kind" = user ]; then
        usermod -u "$want" "$name"
        find / -xdev -uid "$have" -exec chown -h "$want" {} +
      else
        groupmod -g "$want" "$name"
        find / -xdev -gid "$have" -exec chgrp -h "$want" {} +
      fi
    done
  '';

  keep = pkgs.writeShellScript "flotilla-uid-gid-keep" "exit 0";
in
{
  services.flotilla-agent.steps.uid-gid = {
    phase = "before-switch";
    revision = "1";
    inherit check;
    migrations = { inherit renumber keep; };
  };
}
