"""Helpers the tests share: real services, brokers, pipelines of real processes, event factories."""
