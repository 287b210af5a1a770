"""The data contract: inventory data parsed once into typed specs."""
