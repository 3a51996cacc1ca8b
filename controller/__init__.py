"""fleetctl: the operator side of Flotilla."""
