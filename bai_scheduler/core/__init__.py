"""The scheduler's pure core: fGPU units, nodes and devices, placement, the queue. No I/O."""
