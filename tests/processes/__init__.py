"""Small processes that exist for the tests only, registered by the tests that use them."""
