"""The site stage: records (the one serialisation of results), figures, pages and templates."""
