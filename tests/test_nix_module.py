"""Issues 4 and 12: the NixOS module, flake and examples, checked with nix-instantiate.

Every .nix file is parsed, and nixos/module.nix is *evaluated* by the real nixpkgs lib
(`lib.evalModules`: merging, priorities, types, assertions as on a NixOS host) next to
declarations of the NixOS options it touches (tests/nix/nixos-options.nix) and fake
pkgs (tests/nix/pkgs.nix; no store, no daemon: `--store dummy://`). `<nixpkgs>` is
whatever NIX_PATH names (a real nixpkgs where there is one), else the copy of nixpkgs'
lib in /work/shared/nixpkgs-lib (FLOTILLA_NIXPKGS_LIB). The example steps' check
programs are then run for real.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from protocol.steps import CheckOutput, StepsFile

REPO = Path(__file__).resolve().parents[1]
NIX_TESTS = REPO / "tests" / "nix"
SKIP_DIRS = {".venv", ".git", "node_modules", "build", "dist"}
EXPECTED_NIX = {"flake.nix", "nixos/module.nix", "nixos/package.nix",
                "nixos/examples/postgresql-upgrade.nix", "nixos/examples/uid-gid-check.nix"}


def nix_instantiate() -> str:
    path = shutil.which("nix-instantiate")
    if path is None:
        pytest.fail("nix-instantiate is missing: install it with 'sudo apt-get install nix-bin'"
                    " (make test does this)")
    return path


NIXPKGS_LIB = Path(os.environ.get("FLOTILLA_NIXPKGS_LIB", "/work/shared/nixpkgs-lib"))


def nix_path() -> str:
    """NIX_PATH with a `nixpkgs=` entry: the caller's (a real nixpkgs) or the lib copy."""
    current = os.environ.get("NIX_PATH", "")
    if any(e.startswith("nixpkgs=") for e in current.split(":")):
        return current
    if not (NIXPKGS_LIB / "lib" / "default.nix").exists():
        pytest.fail(f"no nixpkgs lib: set NIX_PATH=nixpkgs=/path/to/nixpkgs (or "
                    f"FLOTILLA_NIXPKGS_LIB to a folder holding nixpkgs' lib/; {NIXPKGS_LIB} "
                    "has none)")
    return f"nixpkgs={NIXPKGS_LIB}" + (f":{current}" if current else "")


def run_nix(*args: str) -> subprocess.CompletedProcess[str]:
    """nix-instantiate without a daemon or a real store (works as any user)."""
    return subprocess.run([nix_instantiate(), "--store", "dummy://", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NIX_REMOTE": "", "NIX_PATH": nix_path()},
                          cwd=REPO)


def nix_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*.nix")
                  if not SKIP_DIRS.intersection(p.relative_to(REPO).parts))


def test_the_nix_files_we_ship_exist() -> None:
    assert set(nix_files()) >= EXPECTED_NIX


@pytest.mark.parametrize("path", nix_files())
def test_nix_file_parses(path: str) -> None:
    r = run_nix("--parse", path)
    assert r.returncode == 0, f"{path} does not parse: {r.stderr.strip()}"


def evaluate(expr: str, **args: str) -> Any:
    argv = ["--eval", "--strict", "--json", str(NIX_TESTS / expr)]
    for name, value in args.items():
        argv += ["--arg", name, value]
    r = run_nix(*argv)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def eval_module(settings: str, host_name: str = "web1") -> Any:
    return evaluate("eval-module.nix", settings=settings, hostName=json.dumps(host_name))


TWO_STEPS = """{
  enable = true;
  broker = "mqtts://mqtt.example.org:8883";
  trustedKeys = [ "/etc/flotilla/controller.pub" ];
  steps.postgresql = {
    phase = "before-switch";
    revision = "16";
    check = "/nix/store/11111111111111111111111111111111-pg-check";
    migrations = {
      pg_upgrade = "/nix/store/22222222222222222222222222222222-pg-upgrade";
      keep-old = "/nix/store/33333333333333333333333333333333-keep";
    };
    dump = "/nix/store/44444444444444444444444444444444-pg-dump";
    restore = "/nix/store/55555555555555555555555555555555-pg-restore";
  };
  steps.app = {
    after = [ "postgresql" ];
    user = "app";
    idempotent = true;
    migrations."*" = "/nix/store/66666666666666666666666666666666-app-migrate";
    paths = [ "/var/lib/app" ];
  };
}"""


def test_module_renders_steps_json_into_the_toplevel() -> None:
    out = eval_module(TWO_STEPS)
    assert out["failedAssertions"] == []
    steps = json.loads(out["stepsText"])
    assert steps == {"steps": [
        {"name": "app", "after": ["postgresql"], "user": "app", "phase": "after-switch",
         "revision": "0", "idempotent": True, "check": None,
         "migrations": {"*": "/nix/store/66666666666666666666666666666666-app-migrate"},
         "dump": None, "restore": None, "paths": ["/var/lib/app"]},
        {"name": "postgresql", "after": [], "user": None, "phase": "before-switch",
         "revision": "16", "idempotent": False,
         "check": "/nix/store/11111111111111111111111111111111-pg-check",
         "migrations": {"keep-old": "/nix/store/33333333333333333333333333333333-keep",
                        "pg_upgrade": "/nix/store/22222222222222222222222222222222-pg-upgrade"},
         "dump": "/nix/store/44444444444444444444444444444444-pg-dump",
         "restore": "/nix/store/55555555555555555555555555555555-pg-restore", "paths": []},
    ]}
    parsed = StepsFile.model_validate(steps)  # exactly what the agent will accept
    assert parsed.by_name()["postgresql"].stateful and parsed.by_name()["app"].stateful
    assert out["stepsFile"].endswith("-flotilla-steps.json")
    assert out["systemBuilderCommands"].splitlines() == [
        "mkdir -p $out/flotilla", f"cp {out['stepsFile']} $out/flotilla/steps.json"]


CREDENTIALS = "/run/credentials/flotilla-agent.service"
C_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "/": "/",
             "b": "\b", "f": "\f"}


def systemd_split(line: str) -> list[str]:
    """argv of an ExecStart= line as systemd makes it (systemd.service(5)): specifiers
    first (%% is %, %d the credentials directory), then words with "…"/'…' quoting and
    C escapes, then $$ → $ (a lone $VAR would expand: the test fails on one)."""
    line = line.replace("%%", "\0PCT").replace("%d", CREDENTIALS)
    assert "%" not in line.replace("\0PCT", ""), f"unescaped specifier in {line!r}"
    words, i = [], 0
    while i < len(line):
        if line[i].isspace():
            i += 1
            continue
        word: list[str] = []
        quote = line[i] if line[i] in "\"'" else None
        i += 1 if quote else 0
        while i < len(line) and (line[i] != quote if quote else not line[i].isspace()):
            if line[i] == "\\" and quote:
                esc = line[i + 1]
                if esc == "u":
                    word.append(chr(int(line[i + 2:i + 6], 16)))
                    i += 6
                    continue
                word.append(C_ESCAPES[esc])
                i += 2
                continue
            word.append(line[i])
            i += 1
        i += 1 if quote else 0
        text = "".join(word)
        assert "$" not in text.replace("$$", ""), f"unescaped variable in {text!r}"
        words.append(text.replace("$$", "$").replace("\0PCT", "%"))
    return words


def test_module_defines_a_service_a_switch_never_restarts() -> None:
    out = eval_module(TWO_STEPS)
    svc = out["service"]
    assert svc["restartIfChanged"] is False
    assert svc["unitConfig"] == {"X-StopOnRemoval": False}
    assert svc["wantedBy"] == ["multi-user.target"]
    assert "network-online.target" in svc["after"] and "network-online.target" in svc["wants"]
    assert any(p.endswith("-nix-2.24.10") for p in svc["path"])
    assert any(p.endswith("-systemd-256.8") for p in svc["path"])
    assert systemd_split(svc["serviceConfig"]["ExecStart"]) == [
        f"{out['package']}/bin/fleet-agent", "run", "--backend", "nixos", "--host", "web1",
        "--broker", "mqtts://mqtt.example.org:8883", "--state-dir", "/var/lib/flotilla",
        "--trust-key", "/run/flotilla-agent/trusted-keys.pem"]
    assert svc["serviceConfig"]["LoadCredential"] == []
    assert svc["serviceConfig"]["RuntimeDirectory"] == "flotilla-agent"
    assert "cat /etc/flotilla/controller.pub > /run/flotilla-agent/trusted-keys.pem.tmp" \
        in svc["preStart"]
    assert out["tmpfiles"] == ["d /var/lib/flotilla 0700 root root - -"]
    assert out["options"]["host"] == "web1" and out["options"]["stateDir"] == "/var/lib/flotilla"


def test_module_credentials_keys_and_extra_args() -> None:
    out = eval_module("""{
      enable = true; host = "db-1"; broker = "mqtt://10.0.0.1:1883"; username = "db-1";
      credentialsFile = "/run/secrets/mqtt-password";
      stateDir = "/srv/flotilla";
      trustedKeys = [ "-----BEGIN PUBLIC KEY-----\\nMCowBQYDK2VwAyEA\\n-----END PUBLIC KEY-----\\n"
                      "/etc/second.pub" ];
      extraArgs = [ "--from-cache" "https://cache.example.org/?priority=10%" ];
    }""", host_name="ignored")
    svc = out["service"]
    argv = systemd_split(svc["serviceConfig"]["ExecStart"])
    assert argv[1:] == ["run", "--backend", "nixos", "--host", "db-1",
                        "--broker", "mqtt://10.0.0.1:1883", "--state-dir", "/srv/flotilla",
                        "--trust-key", "/run/flotilla-agent/trusted-keys.pem",
                        "--username", "db-1", "--password-file",
                        f"{CREDENTIALS}/broker-password",
                        "--from-cache", "https://cache.example.org/?priority=10%"]
    assert svc["serviceConfig"]["LoadCredential"] == [
        "broker-password:/run/secrets/mqtt-password"]
    cat = shlex.split(svc["preStart"].splitlines()[0])
    assert cat[0] == "cat" and cat[2:] == ["/etc/second.pub", ">",
                                           "/run/flotilla-agent/trusted-keys.pem.tmp"]
    assert cat[1].startswith("/nix/store/") and cat[1].endswith("-flotilla-trusted-key.pem")
    assert out["tmpfiles"] == ["d /srv/flotilla 0700 root root - -"]


def test_module_mqtt_version_and_a_broker_cluster() -> None:
    out = eval_module('{ enable = true; broker = "mqtt://n1:1883,mqtt://n2:1883"; '
                      'mqttVersion = "3.1.1"; trustedKeys = [ "/k.pem" ]; }')
    argv = systemd_split(out["service"]["serviceConfig"]["ExecStart"])
    assert argv[argv.index("--broker") + 1] == "mqtt://n1:1883,mqtt://n2:1883"
    assert argv[argv.index("--mqtt-version") + 1] == "3.1.1"
    assert out["options"]["mqttVersion"] == "3.1.1"
    bad = eval_module(f'{{ {BASE} mqttVersion = "4"; }}')  # not one of "5", "3.1.1"
    assert bad["options"]["mqttVersion"] is None and bad["service"] is None


def test_exec_start_survives_systemd_quoting_specifiers_and_variables() -> None:
    """Issue 12: escaped like nixpkgs' utils.escapeSystemdExecArg, `$` included (shell
    quoting is wrong for systemd: '\\'' and a bare $HOME would break or expand)."""
    nasty = ["a b", "it's", 'say "hi"', "back\\slash", "$HOME", "${USER}x", "100%", "%n",
             "semi;colon", "tab\there", "ünï"]
    out = eval_module(f"""{{
      enable = true; trustedKeys = [ "/k.pem" ]; broker = {nix_list(["mqtt://b/$x%y z"])[2:-2]};
      extraArgs = {nix_list(nasty)};
    }}""")
    argv = systemd_split(out["service"]["serviceConfig"]["ExecStart"])
    assert argv[argv.index("--broker") + 1] == "mqtt://b/$x%y z"
    assert argv[-len(nasty):] == nasty


def nix_list(items: list[str]) -> str:
    return "[ " + " ".join(json.dumps(i, ensure_ascii=False).replace("${", "\\${")
                           for i in items) + " ]"


MERGING = [
    # a flake's module gives the package with mkDefault (as flake.nix does)
    '{ lib, pkgs, ... }: { services.flotilla-agent.package = lib.mkDefault'
    ' (pkgs.writeText "from-the-flake" ""); }',
    # two modules each add steps, and both add to one step's `after`
    '{ services.flotilla-agent.steps.pg = { check = "/bin/pg-check"; after = [ "net" ]; }; }',
    '{ services.flotilla-agent.steps.net.paths = [ "/var/lib/net" ];'
    '  services.flotilla-agent.steps.pg.after = [ "net" "app" ];'
    '  services.flotilla-agent.steps.app.migrations."*" = "/bin/app"; }',
    # a user's mkForce beats a plain definition elsewhere
    '{ lib, ... }: { services.flotilla-agent.broker = lib.mkForce "mqtts://forced:8883"; }',
    # assertions of other modules are kept next to ours
    '{ assertions = [ { assertion = false; message = "another module says no"; } ]; }',
    # lines from two modules are joined with newlines
    '{ system.systemBuilderCommands = "echo other module"; }',
]


def test_modules_merge_with_priorities_and_assertions_as_on_a_host() -> None:
    """Issue 12: the real module system: definitions merge across modules, mkDefault
    loses to a definition, mkForce beats one, lines get newlines, assertions combine."""
    settings = '{ enable = true; trustedKeys = [ "/k.pem" ]; broker = "mqtt://plain:1883";' \
        ' tags = [ "web" "eu" ]; }'
    modules = "[ " + " ".join(f"({m})" for m in MERGING) + " ]"
    out = evaluate("eval-module.nix", settings=settings, modules=modules)
    assert out["package"].endswith("-from-the-flake")
    assert out["options"]["broker"] == "mqtts://forced:8883"
    assert out["options"]["tags"] == ["web", "eu"]
    steps = {s["name"]: s for s in json.loads(out["stepsText"])["steps"]}
    assert sorted(steps) == ["app", "net", "pg"]
    assert sorted(steps["pg"]["after"]) == ["app", "net", "net"]  # lists concatenate
    assert steps["pg"]["check"] == "/bin/pg-check" and steps["net"]["paths"] == ["/var/lib/net"]
    assert out["failedAssertions"] == ["another module says no"]
    lines = out["systemBuilderCommands"].splitlines()
    assert "echo other module" in lines and "mkdir -p $out/flotilla" in lines
    # without mkDefault the flake's package and the module's default would not clash,
    # but two plain definitions of a single-valued option do:
    r = run_nix("--eval", "--strict", "--json", "-E", "(import ./tests/nix/eval.nix { modules = ["
                f" {{ services.flotilla-agent = {{ {BASE} }}; }}"
                ' { services.flotilla-agent.broker = "mqtt://other"; } ];'
                " }).config.services.flotilla-agent.broker")
    assert r.returncode != 0 and "conflicting definition values" in r.stderr, r.stderr


def test_steps_are_rendered_without_the_service_and_nothing_without_steps() -> None:
    out = eval_module('{ steps.a.migrations."*" = "/bin/true"; }')
    assert out["service"] is None and out["tmpfiles"] is None
    assert out["systemBuilderCommands"] is not None
    assert [s["name"] for s in json.loads(out["stepsText"])["steps"]] == ["a"]
    out = eval_module("{ }")
    assert out["systemBuilderCommands"] is None and out["service"] is None
    assert out["options"]["enable"] is False


KEY = 'enable = true; trustedKeys = [ "/k.pem" ];'
BASE = f'{KEY} broker = "mqtt://b";'


@pytest.mark.parametrize(("settings", "host_name", "message"), [
    (f'{{ {BASE} steps.a.dump = "/bin/d"; }}', "web1",
     "services.flotilla-agent.steps.a: dump and restore go together"),
    (f'{{ {BASE} steps.a = {{ dump = "/d"; restore = "/r"; paths = [ "/x" ]; }}; }}', "web1",
     "services.flotilla-agent.steps.a: use either dump/restore or paths, not both"),
    (f'{{ {BASE} steps.a.after = [ "b" ]; }}', "web1",
     "services.flotilla-agent.steps.a.after: there is no step b"),
    (f'{{ {BASE} steps.a.revision = "1 2"; }}', "web1",
     "services.flotilla-agent.steps.a.revision: use 1-64 of A-Z a-z 0-9 _ . + -"),
    (f'{{ {BASE} steps."-a" = {{ }}; }}', "web1",
     "services.flotilla-agent.steps.-a: a step name is 1-64 of A-Z a-z 0-9 _ . - and starts"
     " with a letter, digit or _"),
    (f"{{ {BASE} }}", "Web_1",
     'services.flotilla-agent.host = "Web_1" is not a valid fleet host name (1-63 of a-z 0-9'
     " -): set it explicitly"),
    ('{ enable = true; broker = "mqtt://b"; }', "web1",
     "services.flotilla-agent.trustedKeys: give at least one controller public key"),
    (f'{{ {BASE} credentialsFile = "secrets/pw"; }}', "web1",
     "services.flotilla-agent.credentialsFile must be an absolute path"),
    # what the agent would refuse at start (exit 2, restarted every 5 s for ever);
    # a broker URL is never quoted (it may hold a password), as the agent does
    (f'{{ {KEY} broker = " "; }}', "web1",
     "services.flotilla-agent.broker: no broker URL given (example: mqtt://127.0.0.1:1883)"),
    (f'{{ {KEY} broker = "mqtt://a:1883,,mqtt://b:1883"; }}', "web1",
     "services.flotilla-agent.broker: invalid broker list: an empty entry between commas"),
    (f'{{ {KEY} broker = "mqtt://a:1883,"; }}', "web1",
     "services.flotilla-agent.broker: invalid broker list: an empty entry between commas"),
    (f'{{ {KEY} broker = "mqtt://a, mqtt://a"; }}', "web1",
     "services.flotilla-agent.broker: invalid broker list: an address is listed twice"),
    # a password in the URL would be in the world-readable Nix store and the unit's argv
    (f'{{ {KEY} broker = "mqtts://web1:s3cret@broker:8883"; }}', "web1",
     "services.flotilla-agent.broker: a broker URL holds a password, which would end up in "
     "the world-readable Nix store: give it in credentialsFile"),
    (f'{{ {KEY} broker = "broker.example.org:1883"; }}', "web1",
     "services.flotilla-agent.broker: not a broker URL (use mqtt://, mqtts://, ws:// or"
     " wss:// and a host; example: mqtts://broker.example:8883)"),
    (f'{{ {KEY} broker = "mqtts://:8883"; }}', "web1",
     "services.flotilla-agent.broker: not a broker URL (use mqtt://, mqtts://, ws:// or"
     " wss:// and a host; example: mqtts://broker.example:8883)"),
    ('{ enable = true; broker = "mqtt://b"; trustedKeys = [ "keys/controller.pub" ]; }', "web1",
     'services.flotilla-agent.trustedKeys: "keys/controller.pub" is neither an absolute path'
     " nor PEM text (-----BEGIN PUBLIC KEY-----); give a relative file as a path:"
     " ./keys/controller.pub"),
    (f'{{ {BASE} stateDir = ""; }}', "web1",
     "services.flotilla-agent.stateDir must be an absolute path"),
    (f'{{ {BASE} stateDir = "var/lib/flotilla"; }}', "web1",
     "services.flotilla-agent.stateDir must be an absolute path"),
])
def test_module_assertions(settings: str, host_name: str, message: str) -> None:
    assert eval_module(settings, host_name)["failedAssertions"] == [message]


@pytest.mark.parametrize(("settings", "fragment"), [
    ('{ steps.a.phase = "sideways"; }', "steps.a.phase' is not of type"),
    ("{ steps.a.idempotent = 1; }", "steps.a.idempotent' is not of type `boolean'"),
    ('{ steps.a.check = "relative/check"; }', "steps.a.check' is not of type"),
    ('{ steps.a.colour = "red"; }', "steps.a.colour' does not exist"),
])
def test_module_option_types_refuse_bad_values(settings: str, fragment: str) -> None:
    r = run_nix("--eval", "--strict", "--json", str(NIX_TESTS / "eval-module.nix"),
                "--arg", "settings", settings)
    assert r.returncode != 0 and fragment in r.stderr, r.stderr


# -- the examples: rendered through the module, check programs run for real -------------------

def eval_example(name: str, host: str) -> Any:
    return evaluate("eval-example.nix", example=f"./nixos/examples/{name}", host=host)


def run_check(script: str, tmp_path: Path, replace: dict[str, str] | None = None
              ) -> CheckOutput:
    for old, new in (replace or {}).items():
        assert old in script
        script = script.replace(old, new)
    f = tmp_path / "check.sh"
    f.write_text(script)
    r = subprocess.run(["bash", str(f)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return CheckOutput.model_validate_json(r.stdout)


@pytest.mark.parametrize(("pg_version", "item", "choices", "default"), [
    (None, None, [], None),
    ("16", None, [], None),
    ("15", "major-upgrade", ["pg_upgrade", "dump-restore", "keep-old"], "pg_upgrade"),
    ("14", "major-upgrade", ["dump-restore", "keep-old"], "dump-restore"),
    ("17", "downgrade", [], None),
])
def test_postgresql_example_check(tmp_path: Path, pg_version: str | None, item: str | None,
                                  choices: list[str], default: str | None) -> None:
    data = tmp_path / "data"
    out = eval_example("postgresql-upgrade.nix", "pkgs: { services.postgresql = { enable = true;"
                       f' package = pkgs.postgresql_16; dataDir = "{data}"; initdbArgs = [ ];'
                       " }; }")
    assert out["failedAssertions"] == []
    [step] = StepsFile.model_validate({"steps": out["steps"]}).steps
    assert (step.name, step.phase, step.revision) == ("postgresql", "before-switch", "16")
    assert set(step.migrations) == {"pg_upgrade", "dump-restore", "keep-old"}
    assert step.dump and step.restore and step.check
    assert "pg_dumpall" in out["programs"][step.dump]
    assert "psql" in out["programs"][step.restore]
    if pg_version is not None:
        data.mkdir()
        (data / "PG_VERSION").write_text(pg_version + "\n")
    checked = run_check(out["programs"][step.check], tmp_path,
                        {"/var/lib/postgresql/15": str(tmp_path / "default-15")})
    if item is None:
        assert checked.items == []
        return
    [found] = checked.items
    assert (found.id, found.severity) == (item, "error")
    assert [c.id for c in found.choices] == choices and found.default == default
    assert f"version {pg_version}" in found.message


def test_uid_gid_example_check(tmp_path: Path) -> None:
    out = eval_example("uid-gid-check.nix", "pkgs: { users.users = {"
                       ' alice = { name = "alice"; uid = 1001; };'
                       ' bob = { name = "bob"; uid = null; }; };'
                       ' users.groups.staff = { name = "staff"; gid = 50; }; }')
    [step] = StepsFile.model_validate({"steps": out["steps"]}).steps
    assert set(step.migrations) == {"renumber", "keep"} and step.phase == "before-switch"
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    paths = {"passwd=/etc/passwd": f"passwd={passwd}", "group=/etc/group": f"group={group}"}
    script = out["programs"][step.check]

    passwd.write_text("root:x:0:0::/root:/bin/sh\nalice:x:1001:100::/home/alice:/bin/sh\n"
                      "bob:x:1002:100::/home/bob:/bin/sh\n")
    group.write_text("root:x:0:\nstaff:x:50:alice\n")
    assert run_check(script, tmp_path, paths).items == []

    passwd.write_text("alice:x:1005:100::/home/alice:/bin/sh\nbob:x:1009:100::/:/bin/sh\n")
    group.write_text("staff:x:51:alice\n")
    [item] = run_check(script, tmp_path, paths).items
    assert (item.id, item.severity, item.default) == ("id-mismatch", "error", None)
    assert item.message == ("user alice has id 1005 here, 1001 in the configuration; "
                            "group staff has id 51 here, 50 in the configuration")
    assert [(c.id, c.destructive) for c in item.choices] == [("renumber", True), ("keep", False)]
