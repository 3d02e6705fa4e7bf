//! A session through a real driver (tokio-postgres) using prepared statements, recorded
//! by `scripts/pg-capture all` as `testdata/pg/driver_prepared.capture`.
//!
//! tokio-postgres sends every parameter in binary format, names its statements, pipelines
//! concurrent queries, and can run a portal with a row limit: the relay's audit events
//! for these are snapshotted in `tests/captures.rs`.
//!
//! Connects to 127.0.0.1:$PGPORT (default 5432) as `postgres`, database `test`.

use std::error::Error;

use tokio_postgres::{Config, NoTls};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let port = match std::env::var("PGPORT") {
        Ok(port) => port.parse()?,
        Err(_) => 5432,
    };
    let (mut client, connection) = Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("test")
        .application_name("pg-capture-driver")
        .connect(NoTls)
        .await?;
    let connection = tokio::spawn(connection);

    client
        .batch_execute(
            "drop table if exists capture_driver;
             create table capture_driver (id int primary key, name text, data bytea, score float8)",
        )
        .await?;

    let insert = client
        .prepare("insert into capture_driver values ($1, $2, $3, $4)")
        .await?;
    client
        .execute(&insert, &[&1i32, &"one", &vec![1u8, 2, 3], &1.5f64])
        .await?;
    client
        .execute(&insert, &[&2i32, &None::<&str>, &None::<Vec<u8>>, &2.5f64])
        .await?;
    // A unique violation: the Execute fails.
    let duplicate = client
        .execute(&insert, &[&1i32, &"dup", &Vec::<u8>::new(), &0.0f64])
        .await;
    assert!(duplicate.is_err(), "duplicate key must fail");

    let select = client
        .prepare("select id, name from capture_driver where id >= $1 order by id")
        .await?;
    let rows = client.query(&select, &[&0i32]).await?;
    assert_eq!(rows.len(), 2);

    // Two queries in flight at once: the driver pipelines them on one connection.
    let (a, b) = tokio::join!(
        client.query_one(
            "select count(*) from capture_driver where score > $1",
            &[&1.0f64]
        ),
        client.query_one("select $1::text || ' pipelined'", &[&"second"]),
    );
    assert_eq!(a?.get::<_, i64>(0), 2);
    assert_eq!(b?.get::<_, String>(0), "second pipelined");

    // A portal run one row at a time: PortalSuspended, then CommandComplete.
    let transaction = client.transaction().await?;
    let portal = transaction.bind(&select, &[&0i32]).await?;
    let first = transaction.query_portal(&portal, 1).await?;
    let rest = transaction.query_portal(&portal, 10).await?;
    assert_eq!((first.len(), rest.len()), (1, 1));
    transaction.commit().await?;

    client.batch_execute("drop table capture_driver").await?;
    drop(client);
    connection.await??;
    Ok(())
}
