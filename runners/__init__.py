"""How a trial trains: data preparation, the cached base model, and the SFT run itself."""
