"""Built-in ablate plugins, installed as `ablate_plugins` and registered through the `ablate` entry-point group."""
