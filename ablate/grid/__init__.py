"""The grid wing: grids expanded into cells (`expansion`), the SQLite results store (`store`), and running cells
through a launcher, each storing its own row (`runner`)."""
