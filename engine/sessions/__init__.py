"""The sessions room: the session store (which conversation holds which cache row, persistence and versions),
the cluster store and its shared index."""
