"""The public wire of Tessera: message schema, ZMQ client SDK, OpenAI HTTP adapter, offline API."""
