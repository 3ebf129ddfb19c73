"""Jet data: generation (Pythia 8 + FastJet), conversion (JetClass, top tagging), shards, reader."""
