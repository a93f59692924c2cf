"""The contract shared by the API and the workers: settings, schema, job store, storage."""
