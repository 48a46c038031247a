"""BB84 acquisition: timing synchronisation, acquisition run, reprocessing."""
