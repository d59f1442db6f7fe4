"""How a trial is scored. `registry.OBJECTIVES` lists what a config may name."""
