"""Helpers for demos and tests: throwaway RabbitMQ brokers and friends."""
