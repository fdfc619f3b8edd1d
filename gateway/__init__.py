"""ota-gateway: an mTLS gateway that makes over-the-air updates of Capacitor apps safe."""

__version__ = "0.1.0"
