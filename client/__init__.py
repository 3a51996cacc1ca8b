"""fleet-agent: the host side of Flotilla."""
