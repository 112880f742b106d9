"""The attack lab: things placed in the path of a migration to watch and change it."""
