"""Training stages: thin layers over TRL's trainers, run on our backbone."""
