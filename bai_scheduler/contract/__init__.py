"""What the hub's spawner and the scheduler service share: labels, catalog, options, client."""
