-- Plain GET of the URL given to wrk (discovery, JWKS, hello-world).
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
