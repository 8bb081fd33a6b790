"""Alembic environment: the URL from the project's settings, the metadata from its tables."""

from __future__ import annotations

import dataclasses
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import make_url

from eventpipe.database import make_engine
from eventpipe.settings import settings_or_exit
from eventpipe.tables import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or settings_or_exit("alembic").database_url
    )


def run_migrations_offline() -> None:
    """Emit the SQL for a database that may not be reachable from here (e.g. SQL Server)."""
    url = make_url(_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # No statement timeout: a migration may rebuild an index of a table of millions of rows,
    # which the time a batch's statement may take says nothing of. The lock timeout stays: a
    # migration queued behind a long transaction would hold up every batch queued behind it.
    settings = dataclasses.replace(settings_or_exit("alembic"), database_url=_url(),
                                   database_statement_timeout_s=0)
    engine = make_engine(settings, writer=False)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
