"""sealift: secure live migration of virtual machines."""

__version__ = "0.1.0"
