"""What comes back from hosts: reading messages, the live view, status, watch and rendering."""
