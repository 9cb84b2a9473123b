"""Development tools shipped with the package: a Coinbase-compatible price stub, and the embedded
PostgreSQL and private RabbitMQ node that ./run.sh uses when no URL is configured."""
