# Flotilla state step: PostgreSQL major upgrades (import next to nixos/module.nix).
#
# A new PostgreSQL major cannot start on an older data directory. Before switching,
# the check compares the data directory's PG_VERSION with the new package's major and,
# when they differ, offers: pg_upgrade (copy mode, the old cluster stays intact),
# dump and restore (pg_dumpall from the running old server, psql into a fresh
# cluster), or keep the old major (the deploy stops: pin services.postgresql.package).
# The migrations run before the switch, while the old server still runs; the switch
# then starts the new server on the new cluster. On rollback the old cluster is put
# back (or rebuilt from the pg_dumpall taken before migrating).
{ config, lib, pkgs, ... }:

let
  pg = config.services.postgresql;
  new = pg.package;
  newMajor = lib.versions.major new.version;
  # The major this fleet upgrades from: pg_upgrade and a rebuild need its binaries.
  old = pkgs.postgresql_15;
  oldMajor = lib.versions.major old.version;
  newData = pg.dataDir;
  # NixOS' default dataDir is /var/lib/postgresql/<major>; with a fixed dataDir the
  # old cluster is moved aside to DATADIR-<old major> before upgrading.
  oldDefaultData = "/var/lib/postgresql/${oldMajor}";

  common = ''
    set -eu
    export PATH=${lib.makeBinPath [ pkgs.coreutils pkgs.util-linux pkgs.systemd ]}:$PATH
    new_data=${lib.escapeShellArg newData}
    old_default=${lib.escapeShellArg oldDefaultData}
    new_major=${newMajor}
    old_major=${oldMajor}
    as_pg() { runuser -u postgres -- "$@"; }
    # Where the cluster the running system uses lives, and its version ("" if none).
    find_old() {
      old_data="" old_version=""
      for d in "$new_data" "$new_data-$old_major" "$old_default"; do
        if [ -f "$d/PG_VERSION" ]; then
          read -r v < "$d/PG_VERSION"
          if [ "$v" != "$new_major" ] || [ "$d" = "$new_data" ]; then
            old_data=$d old_version=$v
            return 0
          fi
        fi
      done
    }
    init_new() {
      if [ "$old_data" = "$new_data" ]; then
        mv "$new_data" "$new_data-$old_version"
        old_data="$new_data-$old_version"
      fi
      install -d -m 0700 -o postgres -g postgres "$new_data"
      as_pg ${new}/bin/initdb -D "$new_data" ${lib.escapeShellArgs pg.initdbArgs}
    }
    work() { w=$(mktemp -d); chown postgres "$w"; cd "$w"; }
  '';

  check = pkgs.writeShellScript "flotilla-postgresql-check" ''
    ${common}
    find_old
    if [ -z "$old_version" ] || [ "$old_version" = "$new_major" ]; then
      printf '{"items": []}\n'
      exit 0
    fi
    if [ "''${old_version%%.*}" -gt "$new_major" ] 2>/dev/null; then
      printf '{"items": [{"id": "downgrade", "severity": "error", "message": "PostgreSQL data in %s is version %s, newer than the new system'"'"'s %s: downgrades are not possible", "choices": []}]}\n' \
        "$old_data" "$old_version" "$new_major"
      exit 0
    fi
    upgrade=""
    default=dump-restore
    if [ "$old_version" = "$old_major" ]; then
      upgrade='{"id": "pg_upgrade", "label": "pg_upgrade", "description": "pg_upgrade --copy into a new cluster; the old cluster stays for rollback (fast)", "destructive": false}, '
      default=pg_upgrade
    fi
    printf '{"items": [{"id": "major-upgrade", "severity": "error", "message": "PostgreSQL data in %s is version %s; the new system runs %s", "choices": [%s{"id": "dump-restore", "label": "dump and restore", "description": "pg_dumpall from the running %s server, psql into a new %s cluster (slow, portable)", "destructive": false}, {"id": "keep-old", "label": "keep PostgreSQL %s", "description": "do not upgrade: stop this deploy, then pin services.postgresql.package", "destructive": false}], "default": "%s"}]}\n' \
      "$old_data" "$old_version" "$new_major" "$upgrade" "$old_version" "$new_major" \
      "$old_version" "$default"
  '';

  pgUpgrade = pkgs.writeShellScript "flotilla-postgresql-pg-upgrade" ''
    ${common}
    find_old
    systemctl stop postgresql.service
    init_new
    work
    as_pg ${new}/bin/pg_upgrade --copy \
      --old-datadir "$old_data" --new-datadir "$new_data" \
      --old-bindir ${old}/bin --new-bindir ${new}/bin
  '';

  dumpRestore = pkgs.writeShellScript "flotilla-postgresql-dump-restore" ''
    ${common}
    find_old
    work
    as_pg ${new}/bin/pg_dumpall -f "$w/all.sql"
    systemctl stop postgresql.service
    init_new
    as_pg ${new}/bin/pg_ctl -D "$new_data" -w -o "-c listen_addresses= -k $w" start
    as_pg ${new}/bin/psql -X -v ON_ERROR_STOP=1 -h "$w" -d postgres -f "$w/all.sql"
    as_pg ${new}/bin/pg_ctl -D "$new_data" -w stop
  '';

  keepOld = pkgs.writeShellScript "flotilla-postgresql-keep-old" ''
    echo "PostgreSQL stays at its old major: pin services.postgresql.package to it and redeploy" >&2
    exit 1
  '';

  # The rollback point: a full logical dump of the running (old) server.
  dump = pkgs.writeShellScript "flotilla-postgresql-dump" ''
    ${common}
    as_pg ${new}/bin/pg_dumpall --clean --if-exists > "$FLOTILLA_DUMP_DIR/all.sql"
  '';

  # Back to the old cluster: move it back if it was moved aside, rebuild it from the
  # dump (old binaries, psql) if it is gone. The migrations never write to it.
  restore = pkgs.writeShellScript "flotilla-postgresql-restore" ''
    ${common}
    systemctl stop postgresql.service || true
    aside="$new_data-$old_major"
    if [ -d "$aside" ]; then
      [ -d "$new_data" ] && mv "$new_data" "$new_data.failed-upgrade-$(date +%s)"
      mv "$aside" "$new_data"
      exit 0
    fi
    if [ -f "$old_default/PG_VERSION" ]; then
      exit 0
    fi
    install -d -m 0700 -o postgres -g postgres "$old_default"
    as_pg ${old}/bin/initdb -D "$old_default" ${lib.escapeShellArgs pg.initdbArgs}
    work
    as_pg ${old}/bin/pg_ctl -D "$old_default" -w -o "-c listen_addresses= -k $w" start
    as_pg ${old}/bin/psql -X -h "$w" -d postgres -f "$FLOTILLA_DUMP_DIR/all.sql"
    as_pg ${old}/bin/pg_ctl -D "$old_default" -w stop
  '';
in
{
  config = lib.mkIf pg.enable {
    services.flotilla-agent.steps.postgresql = {
      phase = "before-switch";
      revision = newMajor;
      inherit check dump restore;
      migrations = {
        pg_upgrade = pgUpgrade;
        dump-restore = dumpRestore;
        keep-old = keepOld;
      };
    };
  };
}
