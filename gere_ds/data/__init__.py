"""Task sets, prompts, the general replay set, collation and samplers."""
