pytest_plugins = ["refcond.testing.fixtures"]
