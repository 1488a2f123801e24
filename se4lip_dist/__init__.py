"""se4lip-dist: prepare, train, tune, extract and evaluate SE4Lip lip-sync speech encoders."""

__version__ = "0.1.0"
