//! The CONNECT client against relay stand-ins.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A relay stand-in: reads one request head, answers `answer`, then
/// echoes what the tunnel carries.
async fn relay(answer: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        s.write_all(answer.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = s.read(&mut buf).await {
            let _ = s.write_all(&buf[..n]).await;
        }
        String::from_utf8_lossy(&head).into_owned()
    });
    (addr, task)
}

#[tokio::test]
async fn a_tunnel_is_asked_for_with_connect_and_carries_bytes_after_200() {
    let (addr, relay) = relay("HTTP/1.1 200 OK\r\n\r\n").await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut s, framed) = connect_tunnel(tcp, "maa", "cp.example.internal:443")
        .await
        .unwrap();
    assert!(
        !framed,
        "a relay that does not answer the header gets a raw tunnel"
    );
    s.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello");
    let head = relay.await.unwrap();
    assert!(
        head.starts_with("CONNECT cp.example.internal:443 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("host: cp.example.internal:443\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("detour-tunnel: framed\r\n"),
        "the agent offers a framed tunnel: {head}"
    );
}

#[tokio::test]
async fn a_relay_that_agrees_frames_the_tunnel() {
    let (addr, _relay) = relay("HTTP/1.1 200 OK\r\ndetour-tunnel: framed\r\n\r\n").await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (_s, framed) = connect_tunnel(tcp, "maa", "cp:443").await.unwrap();
    assert!(framed);
}

#[tokio::test]
async fn a_refusal_names_the_relays_status() {
    let (addr, _relay) = relay("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = connect_tunnel(tcp, "maa", "cp:443").await.unwrap_err();
    assert!(err.is_refusal(), "{err}");
    assert_eq!(
        err.to_string(),
        "peer maa refused the tunnel: HTTP/1.1 403 Forbidden"
    );
}

#[tokio::test]
async fn a_relay_that_speaks_no_http_is_a_protocol_error() {
    let (addr, _relay) = relay("SSH-2.0-OpenSSH\r\n\r\n").await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = connect_tunnel(tcp, "maa", "cp:443").await.unwrap_err();
    assert!(matches!(err, DialError::Protocol { .. }), "{err}");
}
