"""Datasets (CamVid, StreetHazards, BDD-Anomaly, generated scenes), transforms and loaders."""
