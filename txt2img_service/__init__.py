"""The installed service. Its packages keep the short names of the source tree (`api`, `shared`,
`worker`) but are installed inside this package, so an installed service never claims those names
in site-packages; the console entry points in `launch` put them on the path of their own process."""
