"""Choosing endpoints for a request: filters, scorers, pickers. Knows endpoints and numbers only."""
