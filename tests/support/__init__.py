"""Code the tests, the bench and the chaos run share; not part of the product."""
