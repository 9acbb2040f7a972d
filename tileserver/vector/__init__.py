"""Vector data: bases (VECTOR-DB stored data), reading deliveries, queries for WFS and OGC API Features."""
