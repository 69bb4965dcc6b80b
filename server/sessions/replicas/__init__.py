"""Sessions across replicas: the lease each running session holds (and the recovery of a dead
server's sessions), stopping a session wherever it runs, and following sessions another
replica runs."""
