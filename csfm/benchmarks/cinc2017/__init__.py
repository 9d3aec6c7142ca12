"""PhysioNet/CinC Challenge 2017 AF benchmark: scoring, RR features, harness."""
