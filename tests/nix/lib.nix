# A minimal stand-in for nixpkgs' lib: just what nixos/module.nix uses, plus a tiny
# option evaluator (evalOptions, resolve) so tests can evaluate the module without
# nixpkgs. Semantics follow nixpkgs where the module depends on them.
let
  inherit (builtins) attrNames concatStringsSep elem filter foldl' genList isAttrs isBool
    isFunction isInt isList isPath isString length listToAttrs mapAttrs replaceStrings
    stringLength substring toJSON;

  hasPrefix = pref: s: substring 0 (stringLength pref) s == pref;

  mkType = name: check: { inherit name check; merge = loc: v: v; };

  types = {
    bool = mkType "boolean" isBool;
    int = mkType "signed integer" isInt;
    str = mkType "string" isString;
    path = mkType "path" (v: isPath v || (isString v && hasPrefix "/" v)
                              || (isAttrs v && v ? outPath));
    package = mkType "package" (v: isAttrs v && v ? outPath);
    enum = values: mkType "one of ${toJSON values}" (v: elem v values);
    nullOr = t: {
      name = "null or ${t.name}";
      check = v: v == null || t.check v;
      merge = loc: v: if v == null then null else t.merge loc v;
    };
    either = a: b: {
      name = "${a.name} or ${b.name}";
      check = v: a.check v || b.check v;
      merge = loc: v: if a.check v then a.merge loc v else b.merge loc v;
    };
    listOf = t: {
      name = "list of ${t.name}";
      check = isList;
      merge = loc: v: genList (i: checked "${loc}.[${toString i}]" t (builtins.elemAt v i))
                              (length v);
    };
    attrsOf = t: {
      name = "attribute set of ${t.name}";
      check = isAttrs;
      merge = loc: v: mapAttrs (n: x: checked "${loc}.${n}" t x) v;
    };
    submodule = m: {
      name = "submodule";
      check = isAttrs;
      merge = loc: v:
        let mod = if isFunction m then m { name = lastName loc; } else m;
        in evalOptions loc mod.options v;
    };
  };

  # nixpkgs quotes only when needed; a test must not depend on the choice (use shlex).
  escapeShellArg = a:
    let s = toString a; in
    if builtins.match "[[:alnum:],._+:@%/-]+" s != null then s
    else "'${replaceStrings [ "'" ] [ "'\\''" ] s}'";

  lastName = loc: let parts = builtins.split "\\." loc; in builtins.elemAt parts (length parts - 1);

  checked = loc: t: v:
    if t.check v then t.merge loc v
    else throw "A definition for option `${loc}' is not of type `${t.name}'.";

  # Options (nested attrsets of mkOption results) + definitions -> values.
  evalOptions = loc: decls: defs:
    let
      unknown = filter (n: !(decls ? ${n})) (attrNames defs);
      one = n: d:
        let l = "${loc}.${n}"; in
        if d._type or null != "option" then evalOptions l d (defs.${n} or { })
        else if defs ? ${n} then checked l d.type defs.${n}
        else if d ? default then d.default
        else throw "The option `${l}' is used but not defined.";
    in
    if unknown != [ ] then throw "The option `${loc}.${builtins.head unknown}' does not exist."
    else mapAttrs one decls;

  # Apply mkIf/mkMerge the way the module system does for our purposes: false
  # conditions vanish, merges combine attrsets, concatenate lists and join lines.
  resolve = v:
    if isAttrs v && v._type or null == "if" then (if v.condition then resolve v.content else { })
    else if isAttrs v && v._type or null == "merge" then foldl' mergeValues { } (map resolve v.contents)
    else if isAttrs v && !(v ? outPath) then mapAttrs (_: resolve) v
    else v;

  mergeValues = a: b:
    if isAttrs a && isAttrs b && !(a ? outPath) then
      a // mapAttrs (n: bv: if a ? ${n} then mergeValues a.${n} bv else bv) b
    else if isList a && isList b then a ++ b
    else if isString a && isString b then a + b
    else throw "conflicting definitions: ${toJSON a} and ${toJSON b}";
in
{
  inherit types hasPrefix evalOptions resolve;

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = what: {
    _type = "option"; type = types.bool; default = false; description = "Whether to enable ${what}.";
  };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkDefault = v: v;
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  concatLists = builtins.concatLists;
  mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
  filterAttrs = pred: set:
    listToAttrs (map (n: { name = n; value = set.${n}; })
                     (filter (n: pred n set.${n}) (attrNames set)));
  makeBinPath = pkgs: concatStringsSep ":" (map (p: "${p}/bin") pkgs);
  versions.major = v: builtins.head (builtins.splitVersion v);
  inherit escapeShellArg concatStringsSep;
  escapeShellArgs = xs: concatStringsSep " " (map escapeShellArg xs);
}
