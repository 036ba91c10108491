"""Converting heads to and from other formats (Medusa)."""
