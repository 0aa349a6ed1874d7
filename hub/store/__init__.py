"""The database and what it holds: the tables and their status enums, sessions, group commit,
storable values, secrets at rest. Imports nothing above it."""
