"""File server: BitTorrent tracker and transfer scoping for file distribution."""
