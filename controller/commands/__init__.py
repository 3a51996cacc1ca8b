"""`fleetctl`'s subcommands, one module each (registered by `controller.cli`).

They never import each other: what several share lives in `cliutil` (context, options,
output) and `drive` (running a rollout driver in the terminal and its summary);
`demo_fleet` is the simulated fleet `fleetctl demo` deploys.
"""
