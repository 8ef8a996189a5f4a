"""A TLS terminator for the tests: accepts TLS on 127.0.0.1:LISTEN with CERT/KEY and
relays the plaintext bytes to 127.0.0.1:TARGET (the test broker).

Tansu 0.6 cannot serve TLS itself (its --cert and --key options exclude each other), so
the TLS test puts this in front of it, as a load balancer or sidecar would in production.
Usage: tls_proxy.py LISTEN TARGET CERT KEY
"""

import asyncio
import ssl
import sys


async def relay(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen, target, cert, key):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def connection(client_reader, client_writer):
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            relay(client_reader, broker_writer), relay(broker_reader, client_writer)
        )

    server = await asyncio.start_server(connection, "127.0.0.1", listen, ssl=context)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
