#![cfg(feature = "sim")]
//! The seam's network, on real sockets and on turmoil's simulated ones.

use std::time::{Duration, UNIX_EPOCH};

use postern_rt::{Net, Runtime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo_once(net: Net, listen_addr: &str, connect_host: &str) -> std::io::Result<Vec<u8>> {
    let listener = net.listen(listen_addr).await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(async move {
        let mut conn = listener.accept().await?;
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).await?;
        conn.write_all(&buf).await?;
        conn.flush().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut client = net.connect(&format!("{connect_host}:{port}")).await?;
    assert!(client.peer_addr().is_some());
    client.write_all(b"hello").await?;
    let mut back = vec![0u8; 5];
    client.read_exact(&mut back).await?;
    server.await.map_err(std::io::Error::other)??;
    Ok(back)
}

// Real TCP through the seam: a listener on a free port echoes what a client sends.
#[tokio::test]
async fn tokio_net_connects_listens_and_carries_bytes() {
    let back = echo_once(Net::Tokio, "127.0.0.1:0", "127.0.0.1")
        .await
        .unwrap();
    assert_eq!(back, b"hello");
}

// The same code on turmoil: hosts reach each other by name, and the wall clock is the
// simulation's epoch plus simulated time, shifted by skew.
#[test]
fn turmoil_net_and_clock_follow_the_simulation() {
    let epoch = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut sim = turmoil::Builder::new().rng_seed(1).epoch(epoch).build();
    sim.host("server", || async {
        let rt = Runtime::simulated(1, "/nonexistent");
        let listener = rt.net().listen("0.0.0.0:7000").await?;
        let mut conn = listener.accept().await?;
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).await?;
        conn.write_all(&buf).await?;
        Ok(())
    });
    sim.client("client", async {
        let rt = Runtime::simulated(2, "/nonexistent");
        let start = rt.clock().now().as_secs();
        assert!((1_800_000_000..1_800_000_002).contains(&start), "{start}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let later = rt.clock().now().as_secs();
        assert!(later >= start + 3, "{start} -> {later}");
        rt.clock().set_skew_ms(-3_600_000);
        assert!(rt.clock().now().as_secs() <= later - 3_599);

        let mut conn = rt.net().connect("server:7000").await?;
        conn.write_all(b"hello").await?;
        let mut back = [0u8; 5];
        conn.read_exact(&mut back).await?;
        assert_eq!(&back, b"hello");
        Ok(())
    });
    sim.run().unwrap();
}
