"""Beyond one host: a multi-host lab on one machine, a cluster controller, and its journal."""
