"""Build / push / fetch timings of the issue-12 three-host fleet flake, with real Nix.

    .venv/bin/python bench/nixcache.py [--hosts 3] [--rounds 3]

Each round writes a fresh fleet flake (a new nonce, so nothing is cached in the store),
runs the real `fleetctl build @web --flake path:… --cache file://… --sign-key …` (whose
`timings` give `build_s`, every host built in parallel, and `push_s`, sign + copy to the
cache), deletes the closures from the local store, and times the fetch every agent runs
(`nix copy --from URL` with `require-sigs` and the cache key as the only trusted key,
then `nix-store --realise`) for all hosts at once. Needs a writable single-user
/nix/store (root, NIX_REMOTE unset), no broker. The last stdout line is one JSON object
with the medians; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol.models import BinaryCache  # noqa: E402
from protocol.nixref import copy_from_command  # noqa: E402
from tests.nixfleet import NIX_CONFIG, cache_key, write_fleet_flake  # noqa: E402


def one_round(hosts: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="flotilla-nixcache-") as tmp:
        base = Path(tmp)
        names = {f"web{i}": ["web"] for i in range(1, hosts + 1)}
        flake = write_fleet_flake(base, names)
        secret, public = cache_key(base)
        cache = BinaryCache(url=f"file://{base / 'cache'}", public_key=public)
        env = {**os.environ, "NIX_REMOTE": "", "NIX_CONFIG": NIX_CONFIG}
        started = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "controller", "build", "@web", "--flake", flake.ref,
             "--cache", cache.url, "--sign-key", str(secret), "--out", str(base / "d.json"),
             "--state-dir", str(base / "state"), "--inventory", str(base / "none.toml"),
             "--json"], capture_output=True, text=True, env=env, timeout=600)
        wall = time.monotonic() - started
        if r.returncode != 0:
            raise SystemExit(f"fleetctl build failed: {r.stderr}")
        out = json.loads(r.stdout.splitlines()[-1])
        paths = list(out["agents"].values())
        flake.delete_from_store(paths)
        started = time.monotonic()
        procs = [subprocess.Popen(copy_from_command(cache, p), env=env, stderr=subprocess.PIPE)
                 for p in paths]
        for p in procs:
            _, err = p.communicate(timeout=300)
            if p.returncode != 0:
                raise SystemExit(f"fetch failed: {err.decode()}")
        for p in paths:
            subprocess.run(["nix-store", "--realise", p], env=env, check=True,
                           capture_output=True, timeout=120)
        fetch = time.monotonic() - started
        subprocess.run(["nix-store", "--delete", *flake.closure(paths)], env=env,
                       capture_output=True, timeout=120)
        return {"build_s": out["timings"]["build_s"], "push_s": out["timings"]["push_s"],
                "fleetctl_build_wall_s": wall, "fetch_s": fetch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rounds = []
    for i in range(args.rounds):
        r = one_round(args.hosts)
        print(f"round {i + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items()),
              file=sys.stderr)
        rounds.append(r)
    print(json.dumps({"hosts": args.hosts, "rounds": args.rounds, **{
        k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}}))


if __name__ == "__main__":
    main()
