"""The Ray glue, and the only package that imports ray: Ray Train runs (`train`), Ray Tune searches
(`tune`) and evaluation sharded over Ray tasks (`evaluation`). Everything it drives is pure torch."""
