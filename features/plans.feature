@fixture.sqlite
Feature: A plan commits or rolls back as a whole
  A plan whose steps all pass is released: all its changes are committed. A
  plan that fails at any step is rolled back on every database it touched,
  tables it created included, and the plan-failed event is sent.

  Background:
    Given a runtime

  Scenario: A plan whose steps all pass is committed
    Given the plan file "restock.yaml":
      """
      id: restock
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: schema
          resource: inventory
          sql: CREATE TABLE items (sku TEXT PRIMARY KEY, qty INT NOT NULL CHECK (qty >= 0))
        - id: seed
          resource: inventory
          sql: INSERT INTO items (sku, qty) VALUES ('apple', 2), ('pear', 7)
        - id: restock
          resource: inventory
          checkpoint: true
          sql: UPDATE items SET qty = qty + :n WHERE qty < :low
          params: {n: 10, low: 3}
        - id: check
          resource: inventory
          expect:
            sql: SELECT count(*) FROM items WHERE qty < 3
            equals: 0
      """
    When the runtime runs "restock.yaml"
    Then plan "restock" completed
    And "inventory.db" has the items "apple, pear"
    And another program can write to "inventory.db" at once

  Scenario: A failing plan is rolled back on both of its databases, tables it created included
    Given a database "shop.db" with the items "apple"
    And a database "ledger.db" with the items "opening"
    And the plan file "sell.yaml":
      """
      id: sell
      resources:
        shop: {kind: database, engine: sqlite, location: shop.db}
        ledger: {kind: database, engine: sqlite, location: ledger.db}
      steps:
        - id: sales-table
          resource: ledger
          sql: CREATE TABLE sales (sku TEXT, qty INT)
        - id: record
          resource: ledger
          sql: INSERT INTO sales VALUES ('pear', 1)
        - id: restock
          resource: shop
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: book
          resource: ledger
          sql: INSERT INTO items (sku) VALUES ('pear-sold')
        - id: oversell
          resource: shop
          checkpoint: true
          expect:
            sql: SELECT count(*) FROM items
            equals: 99
        - id: never-run
          resource: shop
          sql: DELETE FROM items
      """
    When the runtime runs "sell.yaml"
    Then plan "sell" failed at step "oversell"
    And the error of plan "sell" mentions "expected 99"
    And step "never-run" of plan "sell" not run after 0 attempts
    And "shop.db" has the items "apple"
    And "ledger.db" has the items "opening"
    And "ledger.db" has no table "sales"
    And another program can write to "shop.db" at once
    And another program can write to "ledger.db" at once

  Scenario: A failing SQL statement fails the plan with the database's own message
    Given a database "inventory.db" with the items "apple"
    And the plan file "duplicate.yaml":
      """
      id: duplicate
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: add-pear
          resource: inventory
          sql: INSERT INTO items (sku) VALUES (?)
          params: [pear]
        - id: add-apple-again
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('apple')
      """
    When the runtime runs "duplicate.yaml"
    Then plan "duplicate" failed at step "add-apple-again"
    And the error of plan "duplicate" mentions "UNIQUE constraint failed"
    And "inventory.db" has the items "apple"

  Scenario: A tool step's writes are committed with its plan
    Given a database "inventory.db" with the items "apple"
    And the plan file "report.yaml":
      """
      id: report
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: notify
          tool: send_report
          checkpoint: true
          with: {channel: ops}
      """
    When the runtime runs "report.yaml"
    Then plan "report" completed
    And "inventory.db" has a table "reports" with 1 rows

  Scenario: A tool step's writes are rolled back with its plan
    Given a database "inventory.db" with the items "apple"
    And the plan file "report.yaml":
      """
      id: report
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: notify
          tool: send_report
          with: {channel: ops}
        - id: check
          resource: inventory
          expect:
            sql: SELECT count(*) FROM items
            equals: 2
      """
    When the runtime runs "report.yaml"
    Then plan "report" failed at step "check"
    And "inventory.db" has no table "reports"
    And "inventory.db" has the items "apple"

  Scenario: A tool that raises fails its step and the plan is rolled back
    Given a database "inventory.db" with the items "apple"
    And the plan file "report.yaml":
      """
      id: report
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: restock
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: notify
          tool: send_report
          with: {channel: nowhere}
      """
    When the runtime runs "report.yaml"
    Then plan "report" failed at step "notify"
    And the error of plan "report" mentions "RuntimeError: channel 'nowhere' does not exist"
    And "inventory.db" has the items "apple"
    And "inventory.db" has no table "reports"

  Scenario: An in-memory database is shared by the plans of one runtime, and rolled back like a file
    Given the plan file "fill.yaml":
      """
      id: fill
      resources:
        scratch: {kind: database, engine: sqlite, location: ":memory:"}
      steps:
        - id: schema
          resource: scratch
          sql: CREATE TABLE notes (text TEXT)
        - id: note
          resource: scratch
          sql: INSERT INTO notes VALUES ('kept')
      """
    And the plan file "spoil.yaml":
      """
      id: spoil
      resources:
        scratch: {kind: database, engine: sqlite, location: ":memory:"}
      steps:
        - id: note
          resource: scratch
          sql: INSERT INTO notes VALUES ('lost')
        - id: fail
          resource: scratch
          sql: INSERT INTO no_such_table VALUES (1)
      """
    And the plan file "count.yaml":
      """
      id: count
      resources:
        scratch: {kind: database, engine: sqlite, location: ":memory:"}
      steps:
        - id: count
          resource: scratch
          expect:
            sql: SELECT group_concat(text) FROM notes
            equals: kept
      """
    When the runtime runs "fill.yaml, spoil.yaml, count.yaml"
    Then plan "fill" completed
    And plan "spoil" failed at step "fail"
    And plan "count" completed
    And no file was created in the scenario's folder but the plans

  Scenario Outline: A reading plan with lock <lock> while another plan holds the write turn
    Given a database "inventory.db" with the items "apple"
    And the plan file "count.yaml":
      """
      id: count
      resources:
        inventory:
          kind: database
          engine: sqlite
          location: inventory.db
          lock: <lock>
          busy_timeout: 300ms
      steps:
        - id: count
          resource: inventory
          expect:
            sql: SELECT count(*) FROM items
            equals: 1
      """
    And plan "writer" of the runtime adds item "pear" to "inventory.db"
    When the runtime runs "count.yaml"
    Then plan "count" <outcome>
    When plan "writer" of the runtime is released
    Then "inventory.db" has the items "apple, pear"

    Examples:
      | lock      | outcome                                              |
      | deferred  | completed                                            |
      | immediate | failed at step "count"                               |

  Scenario: A busy database names the plan holding it
    Given a database "inventory.db" with the items "apple"
    And the plan file "add.yaml":
      """
      id: add
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db, busy_timeout: 0.3}
      steps:
        - id: add
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
      """
    And plan "writer" of the runtime adds item "plum" to "inventory.db"
    When the runtime runs "add.yaml"
    Then plan "add" failed at step "add"
    And the error of plan "add" mentions "plan 'writer' holds its write turn"
    When plan "writer" of the runtime is released
    Then "inventory.db" has the items "apple, plum"

  Scenario: A tool may only use the plan's own resources
    Given a database "inventory.db" with the items "apple"
    And the plan file "report.yaml":
      """
      id: report
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: restock
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: notify
          tool: send_report
          with: {resource: warehouse}
      """
    When the runtime runs "report.yaml"
    Then plan "report" failed at step "notify"
    And the error of plan "report" mentions "plan 'report' has no resource 'warehouse' (known: inventory)"
    And "inventory.db" has the items "apple"

  Scenario: An expect query must return exactly one value
    Given a database "inventory.db" with the items "apple, pear"
    And the plan file "check.yaml":
      """
      id: check
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: check
          resource: inventory
          expect:
            sql: SELECT sku FROM items
            equals: apple
      """
    When the runtime runs "check.yaml"
    Then plan "check" failed at step "check"
    And the error of plan "check" mentions "the query must return one row with one value"

  Scenario: Plans run in parallel share one handler and each commits on its own
    Given a database "inventory.db" with an empty items table
    And the plan file "apple.yaml":
      """
      id: apple
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: add
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('apple')
      """
    And the plan file "pear.yaml":
      """
      id: pear
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: add
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: fail
          resource: inventory
          expect: {sql: SELECT count(*) FROM items, equals: 99}
      """
    And the plan file "plum.yaml":
      """
      id: plum
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: add
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('plum')
      """
    When the runtime runs "apple.yaml, pear.yaml, plum.yaml", 3 at a time
    Then plan "apple" completed
    And plan "pear" failed at step "fail"
    And plan "plum" completed
    And "inventory.db" has the items "apple, plum"

  Scenario: A deferred plan that writes while another program holds the lock gets a busy error
    Given a database "inventory.db" with an empty items table
    And another program holds the write lock on "inventory.db"
    And the plan file "add.yaml":
      """
      id: add
      resources:
        inventory:
          kind: database
          engine: sqlite
          location: inventory.db
          journal_mode: delete      # as the file already is: no switch to WAL
          lock: deferred
          busy_timeout: 200ms
      steps:
        - id: add
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('apple')
      """
    When the runtime runs "add.yaml"
    Then plan "add" failed at step "add"
    And the error of plan "add" mentions "stayed locked for longer than busy_timeout (0.2s)"
    When the other program lets go
    And the runtime runs "add.yaml"
    Then plan "add" completed
    And "inventory.db" has the items "apple"
