"""supplychain package."""
