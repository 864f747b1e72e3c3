"""The Hydra configs of ``sgsc-train`` (a package so Hydra finds them in an installed wheel)."""
