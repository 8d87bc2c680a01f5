"""The V&L transformer trainer that reads feature stores and pair shards."""
