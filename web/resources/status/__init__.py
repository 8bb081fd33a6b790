"""The pipeline's state: partitions, processes, throughput, dead letters."""
